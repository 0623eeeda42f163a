"""The reference a train step is measured against: a bare GradientTape + SGD step.

ResNet-20, cross entropy and Keras SGD with momentum in one `tf.function`, nothing
else (no L2, no scaling, no diagnostics, no Keras `fit`). `experiments.benchmark`
times the project's step against it; `tests/test_train_step.py` holds the step's op
count to it. No absl flags here, so that tests can import it.
"""

# Ops that compute nothing: constants, variable reads and handles, graph plumbing.
NON_COMPUTE_OPS = {"Const", "Identity", "IdentityN", "NoOp", "Placeholder", "ReadVariableOp",
                   "VarHandleOp", "_Arg", "_Retval", "StopGradient"}


def compute_ops(concrete_function):
    """Ops of a traced function, its nested function bodies included, less NON_COMPUTE_OPS."""
    graph_def = concrete_function.graph.as_graph_def()
    types = [node.op for node in graph_def.node]
    types += [node.op for f in graph_def.library.function for node in f.node_def]
    return sum(t not in NON_COMPUTE_OPS for t in types)


def bare_loop(batch_size):
    """(b): ResNet-20, cross entropy and Keras SGD with momentum in one tf.function, nothing else.

    Returns (run(iterator, steps) -> None, the traced step's compute ops).
    """
    import keras
    import tensorflow as tf

    from resnet_cifar import fidelity, models

    model = models.build_resnet20()
    optimizer = keras.optimizers.SGD(fidelity.BASE_LEARNING_RATE, momentum=fidelity.MOMENTUM)
    optimizer.build(model.trainable_variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss

    def run(iterator, steps):
        for _ in range(steps):
            loss = step(*next(iterator))
        float(loss)           # one host read at the end, as fit's last step has

    spec = (tf.TensorSpec([batch_size, 32, 32, 3], tf.float32), tf.TensorSpec([batch_size], tf.int32))
    return run, compute_ops(step.get_concrete_function(*spec))
