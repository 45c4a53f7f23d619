"""Training as named stages, in the order api._train_process runs them: prepare the run, load the data, build
the model, fit, test, write (one module each). api.py holds the verbs and that sequence; the stages hold the work.
"""
