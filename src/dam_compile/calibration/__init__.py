"""Offline DAM profiles: calibration on sample text (``calibrate``), held-out recall (``holdout``), the profile
object (``profile``) and its safetensors file (``profile_file``)."""
