"""RL with verifiable rewards on MATH: Negative / Positive Sample Reinforcement and W-REINFORCE."""
