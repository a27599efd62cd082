"""The stages of the lifecycle as thin wiring over the library: each one reads and writes files.

pretrain.py  token shards -> a trained model (a dataset + the family's objective over train/stage.py)
speedrun.py  corpus -> clean -> tokenizer -> shards -> pretrain -> samples -> report, within a time budget
scaling.py   a grid of pretraining runs for a scaling-law fit (the fit itself is lmstack.evals.scaling)
"""
