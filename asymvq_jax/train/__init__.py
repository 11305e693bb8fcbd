"""Training: the default recipe, the train state, the jitted step, the loop, stages of a run."""
