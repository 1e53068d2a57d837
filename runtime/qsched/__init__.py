"""Scheduler-side correction of a compressed model (after Q-Sched, arXiv 2509.01624), one module per job.

- :mod:`runtime.qsched.correction`: the per-step coefficients and their JSON file;
- :mod:`runtime.qsched.apply`: applying them on a private copy of a pipeline's scheduler;
- :mod:`runtime.qsched.calibration`: the calibration sampling runs the fits make, and their record;
- :mod:`runtime.qsched.trajectory_fit`: fitting them to the dense model's trajectory;
- :mod:`runtime.qsched.reference_free_fit`: fitting the paper's ramps to a quality score (:mod:`evaluation.jaq`).

The method, both objectives and why: docs/qsched.md.
"""
