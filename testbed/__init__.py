"""Real testbeds shipped with diffsample: the exact Gaussian mixture (:mod:`.gmm`) and the bundled
MNIST model (:mod:`.mnist`)."""
