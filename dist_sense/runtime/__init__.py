"""Process-level helpers every layer may use: the array backend (numpy or cupy), fault
injection points for the crash tests, TensorBoard writers, and the install-time warm-up."""
