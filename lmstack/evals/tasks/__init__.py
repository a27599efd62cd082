"""lmstack.evals.tasks"""
