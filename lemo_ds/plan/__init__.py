"""Will it fit? The planner: predicted peak device and host memory of a launch/train.py job, the cheapest change
that fits, the longest sequence that fits (``python -m lemo_ds.plan``; launch/train.py checks before loading).

memory.py: the formula and its calibrated constants; job.py: a job's flags and config -> the model's Setup;
search.py: budgets, the cheapest fitting change, the longest fitting length; refusal.py: the launcher's one line.
"""
