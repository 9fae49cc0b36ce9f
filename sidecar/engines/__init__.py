"""Local models: engines that run a model inside this process, each owned by one worker thread."""
