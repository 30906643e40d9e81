"""RL maths, pure functions of tensors: advantage estimators (GAE, group-normalised, RLOO, REINFORCE++) and KL estimators."""
