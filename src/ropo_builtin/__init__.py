"""The built-in demonstration: a synthetic sorting task with a gold reward, run end to end
(`ropo builtin`, `make train`). A package beside the ropo library, which never imports it.

Public interface (import from the submodules; this package imports nothing, so that
`python -m ropo_builtin` runs cleanly):
    ropo_builtin.settings: TaskSettings (read by ropo.config_load.load_settings)
    ropo_builtin.pipeline: run_builtin(settings), run_sweep(settings)
    ropo_builtin.stats:    paired bootstrap intervals (sweep_stats.py applies them to runs)
    ropo_builtin.sorting:  make_task(...), gold_reward(prompt, response)
"""
