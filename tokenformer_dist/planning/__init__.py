"""Predictions made before a run: the layout planner (`plan`: memory, step time, tokens/s, MFU), the census of
the operations one step launches that the planner charges host time for (`census`), and the checkpoint cadence
derived from the planner's step time (`cadence`). The trainer reads the cadence at start-up."""
