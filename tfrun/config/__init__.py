"""Config schema, registration and composition of a run."""
