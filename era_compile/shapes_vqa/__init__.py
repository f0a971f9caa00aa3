"""shapes-VQA: a synthetic visual question answering task, a small LLaVA trained on it, and its
accuracy under every pruning strategy (``era-compile eval shapes-vqa``).

``task`` draws the samples, ``tokenizer`` holds the word vocabulary, ``model`` builds and loads
the LLaVA, ``train`` trains it.
"""
