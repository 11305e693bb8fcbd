"""Decoder training: the default recipe, the train state, the jitted step, the loop."""
