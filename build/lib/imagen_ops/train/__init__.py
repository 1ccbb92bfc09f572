"""One trainer for every cascade stage: EMA, exact resume, DDP, tracking."""
