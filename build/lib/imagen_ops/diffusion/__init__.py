"""Continuous-time diffusion: log-SNR schedules, objectives, guidance wrappers, samplers."""
