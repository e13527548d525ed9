"""Comparing runs: reading run folders (`runs`, `history`), the comparison table (`table`), the
paper-style plots (`plots`, `attention`), the written report (`build`, `wandb_log`) and running sweeps (`sweep`)."""
