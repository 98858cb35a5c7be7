"""Trainer plug-ins: the `monitor.StepMonitor` inside an RL framework's own loop, logging
under the framework's metric names and conventions (docs/integrations.md). One module per
framework; each imports its framework only when asked to register with it."""
