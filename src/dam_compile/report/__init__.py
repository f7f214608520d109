"""What users read about a compile: the dump folder (``dump``), plots (``visuals``) and the per-site measures
behind ``explain`` (``site_measures``)."""
