"""lmstack.train"""
