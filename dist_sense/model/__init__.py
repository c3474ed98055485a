"""Models and what runs them: the teacher (ZeRO-3 or replicated), the student, the sense
loss, and SenseEncoder for using a finished run."""
