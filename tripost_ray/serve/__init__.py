"""Ray Serve applications: the scripted teacher behind LLM wire formats."""
