"""lmstack.evals"""
