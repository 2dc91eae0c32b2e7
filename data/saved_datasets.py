"""What the text, audio and image sources share when they read Hugging Face datasets: the error they raise,
split names (`val` = `validation`), one-line error text, and a dataset saved with `save_to_disk`."""


class DataSourceError(ValueError):
    """A source that cannot be read; the message says what to do instead."""


def split_name(split: str, available: list[str] | None = None) -> str:
    """`val` means `validation`; with the `available` splits known, either name finds the other."""
    if available is None:
        return "validation" if split == "val" else split
    alias = {"val": "validation", "validation": "val"}.get(split)
    return alias if split not in available and alias in available else split


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def load_saved_dataset(from_disk: str, split: str):
    """(dataset, True) for `split` of a DatasetDict saved at `from_disk`, or (the dataset, False) when a single
    Dataset was saved there (the caller decides what a split means for it). DataSourceError otherwise."""
    import datasets

    try:
        dataset = datasets.load_from_disk(from_disk)
    except (FileNotFoundError, ValueError) as error:
        raise DataSourceError(f"--from_disk {from_disk} is not a dataset written by save_to_disk "
                              f"({one_line(error)})") from error
    if not isinstance(dataset, datasets.DatasetDict):
        return dataset, False
    name = split_name(split, list(dataset))
    if name not in dataset:
        raise DataSourceError(f"--from_disk {from_disk} has no split {split!r}; available: {', '.join(dataset)}")
    return dataset[name], True
