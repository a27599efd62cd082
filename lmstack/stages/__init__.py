"""The stages of the lifecycle as thin wiring over the library: each one reads and writes files.

pretrain.py  token shards -> a trained model (a dataset + the family's objective over train/stage.py)
speedrun.py  corpus -> clean -> tokenizer -> shards -> pretrain -> samples -> report, within a time budget
scaling.py   a grid of pretraining runs for a scaling-law fit (the fit itself is lmstack.evals.scaling)
sft.py       a checkpoint + conversations -> a fine-tuned model (full or LoRA; padded or packed batches)
self_instruct.py  a model -> its own filtered instruction data (JSONL for sft); seed_tasks.jsonl is the shipped seed set
"""
