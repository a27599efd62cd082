"""lmstack.interop"""
