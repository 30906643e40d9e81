"""RL maths, pure functions of tensors: advantage estimators (GAE, group-normalised, RLOO, REINFORCE++), KL estimators and Math-Shepherd process labels."""
