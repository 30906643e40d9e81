"""RL maths: advantages (GAE, group-normalised, whitening), KL estimators, rollouts, held-out KL."""
