"""Solutions to lesson 4's exercises, and in WRONG a plausible mistake for each (its check must fail it)."""


def best_fit_row(lengths, T):
    waiting = dict(enumerate(lengths))  # document index -> length, in index order (max/min keep the first on ties)
    row, space = [], T + 1
    while space > 0:
        fitting = [k for k, n in waiting.items() if n <= space]
        if not row:  # a row starts with the longest document
            k = max(waiting, key=waiting.get)
        elif fitting:  # then the longest one that still fits
            k = max(fitting, key=waiting.get)
        else:  # nothing fits: crop the shortest to the space left
            k = min(waiting, key=waiting.get)
        taken = min(waiting.pop(k), space)
        row.append((k, taken))
        space -= taken
    return row


def accumulate_gradients(model, x, y, micro_steps):
    rows = x.size(0) // micro_steps
    total = 0.0
    for i in range(micro_steps):
        loss = model(x[i * rows:(i + 1) * rows], y[i * rows:(i + 1) * rows])  # the mean over this slice's tokens
        (loss / micro_steps).backward()  # .grad adds up: the mean of the slices' gradients
        total += loss.item() / micro_steps
    return total


def first_fit_row(lengths, T):
    """Takes the first document that fits (in index order), not the longest one."""
    waiting = dict(enumerate(lengths))
    row, space = [], T + 1
    while space > 0:
        fitting = [k for k, n in waiting.items() if n <= space]
        k = fitting[0] if fitting else min(waiting, key=waiting.get)
        taken = min(waiting.pop(k), space)
        row.append((k, taken))
        space -= taken
    return row


def accumulate_unscaled_gradients(model, x, y, micro_steps):
    """Backpropagates each slice's mean loss as it is: the gradient comes out micro_steps times too large."""
    rows = x.size(0) // micro_steps
    losses = []
    for i in range(micro_steps):
        loss = model(x[i * rows:(i + 1) * rows], y[i * rows:(i + 1) * rows])
        loss.backward()
        losses.append(loss.item())
    return sum(losses) / micro_steps


WRONG = {"best_fit_row": first_fit_row, "accumulate_gradients": accumulate_unscaled_gradients}
