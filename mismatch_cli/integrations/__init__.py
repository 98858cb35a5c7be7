"""Trainer plug-ins: `monitor.StepMonitor` inside an RL framework's own loop (TRL, slime,
SkyRL), fed the trainer's own per-token tensors and logging under the framework's metric names
and conventions (docs/integrations.md). One module per framework. Upstream of the run
directory: they may import torch and, when asked to register with it, the framework."""
