"""lmstack.prompting"""
