"""Shipped training presets, one TOML file each (read by cnnkit.config; no code here)."""
