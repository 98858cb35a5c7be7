"""Plug-ins that run inside RL trainers (TRL, slime, SkyRL, ...): they feed the trainer's own
per-token tensors to `monitor.StepMonitor` and log through the trainer's logger. Upstream of
the run directory: they may import torch and the trainer's framework."""
