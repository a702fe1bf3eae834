"""tfrun's Hydra launcher plugin (discovered under the ``hydra_plugins`` namespace)."""
