"""Ray Serve applications: the scripted teacher behind LLM wire formats, and the trained model
behind the OpenAI API (self-improving inference); ``common`` holds what both share."""
