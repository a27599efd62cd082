"""lmstack.train: the one training loop and what it needs.

loop.py    train(): the loop as a table of contents (train_step + named helpers), RunState, evaluate
stage.py   the setup every training stage shares (config, run directory, resume, distributed, summary)
budget.py  wall-clock budgets: plans the step count from the measured cost of steps, evals and saves
losses.py  pure objectives, one factory per name in FACTORIES (models.FAMILIES names each family's)
optim.py   AdamW parameter groups and learning-rate schedules
dist.py    torchrun / torch.distributed setup and teardown
"""
