"""The built-in demonstration: a synthetic sorting task with a gold reward, run end to end.

Public interface (import from the submodules; this package imports nothing, so that
`python -m ropo.task.pipeline` runs cleanly):
    ropo.task.settings: TaskSettings, parse_settings
    ropo.task.pipeline: run_builtin(settings, out), run_sweep(settings, out)
    ropo.task.stats:    paired bootstrap intervals (sweep_stats.py applies them to runs)
    ropo.task.sorting:  make_task(...), gold_reward(prompt, response)
"""
