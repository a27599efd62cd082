"""lmstack.serve"""
