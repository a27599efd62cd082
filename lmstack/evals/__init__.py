"""lmstack.evals: evaluation.

task.py (+ tasks/)   one Task interface, one file per benchmark; also the RL reward hook
run.py               `lmstack eval`: run tasks on a checkpoint, print the table, write results JSON
lm.py                the model wrapper tasks score with (engine or plain backend); lm_eval_adapter.py
metrics.py, sandbox.py, report.py, scaling.py   metrics, the code sandbox, report pages, scaling-law fits
"""
