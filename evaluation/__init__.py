"""Quality evaluation: the digit classifier and digit data, prompt accuracy, Fréchet distance, CLIP score, and
the scores a scheduler correction optimises (JAQ). Below the stages: runtime, CLI and benchmarks all use it."""
