"""lmstack.tools"""
