"""Plans computed from the input at run time: the block estimators (``block_estimates``, registered by name in
``estimators``), the PyTorch dynamic planner (``dynamic_plan``), its fused Triton versions
(``adaptive_plan_kernel``, ``sampled_plan_kernel``) and the query-aware decode plan (``decode_plan``)."""
