"""Training code that knows nothing of ComfyUI: config, data, objective, loop, file I/O."""
