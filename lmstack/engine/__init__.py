"""lmstack.engine"""
