"""Running a model: prompts, the decode loop, chat sessions and batch answers to question files. Layer 3."""
