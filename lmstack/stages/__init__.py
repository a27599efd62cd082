"""lmstack.stages"""
