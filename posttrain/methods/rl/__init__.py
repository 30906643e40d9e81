"""Reinforcement learning and preference optimisation: reward models, DPO, PPO, GRPO."""
