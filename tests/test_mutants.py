"""tests/mutations.py stays usable: every mutation's snippet occurs exactly once in
the code of today's azure_provisioning.py (comments are not code) and its modules exist.  (The campaign itself is
`python3 tests/mutations.py`, not part of unittest: it runs suites many times.)"""

import io
import os
import tokenize
import unittest

from tests import mutations


class MutationList(unittest.TestCase):
    def test_every_snippet_occurs_exactly_once(self):
        text = mutations.read_target()
        for mutation in mutations.MUTATIONS:
            with self.subTest(mutation=mutation.id):
                self.assertIsNone(mutations.stale(mutation, text))
                mutated = mutations.mutate(text, mutation)
                self.assertNotEqual(mutated, text)
                compile(mutated, mutation.id, 'exec')   # a mutant is a bug, not a SyntaxError

    def test_ids_unique_and_modules_exist(self):
        ids = [m.id for m in mutations.MUTATIONS]
        self.assertEqual(len(ids), len(set(ids)))
        self.assertGreaterEqual(len(ids), 15)
        for mutation in mutations.MUTATIONS:
            with self.subTest(mutation=mutation.id):
                self.assertTrue(mutation.modules)
                self.assertTrue(mutation.description)
                for module in mutation.modules:
                    path = os.path.join(mutations.REPO, *module.split('.')) + '.py'
                    self.assertTrue(os.path.isfile(path), module)

    def test_stale_snippet_is_named(self):
        mutation = mutations.MUTATIONS[0]
        with self.assertRaisesRegex(ValueError, 'mutation %s is stale' % mutation.id):
            mutations.mutate('nothing here', mutation)
        with self.assertRaisesRegex(ValueError, 'occurs 2 times'):
            mutations.mutate(mutation.source * 2, mutation)


class Copies(unittest.TestCase):
    def test_a_copy_can_be_read_by_other_users(self):
        # tests run the script as nobody (test_identity's refusals and --status): in a
        # copy only root could enter they failed on the baseline and counted for nothing
        import shutil
        import stat
        import tempfile
        snapshot = tempfile.mkdtemp(prefix='azp-mutation-snapshot-')
        self.addCleanup(shutil.rmtree, snapshot)
        os.makedirs(os.path.join(snapshot, 'tests'))
        with open(os.path.join(snapshot, 'tests', 'x.py'), 'w') as f:
            f.write('x = 1\n')
        os.chmod(os.path.join(snapshot, 'tests', 'x.py'), 0o644)
        copy = mutations.copy_snapshot(snapshot)
        self.addCleanup(shutil.rmtree, copy)
        for path in (copy, os.path.join(copy, 'tests'), os.path.join(copy, 'tests', 'x.py')):
            with self.subTest(path=path):
                mode = os.stat(path).st_mode
                wanted = (stat.S_IROTH | stat.S_IXOTH) if stat.S_ISDIR(mode) else stat.S_IROTH
                self.assertEqual(mode & wanted, wanted, oct(mode))


def with_comments_rewritten(text, words):
    """text with every comment's words replaced by `words`, its code as it was."""
    lines = io.StringIO(text).readlines()
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type == tokenize.COMMENT:
            (row, column), (_, end) = token.start, token.end
            line = lines[row - 1]
            lines[row - 1] = line[:column] + '# ' + words + line[end:]
    return ''.join(lines)


class CodeNotComments(unittest.TestCase):
    """Mutations find code: no comment makes one stale, moves it, or is mutated."""

    def test_comments_rewritten_change_no_mutation(self):
        text = mutations.read_target()
        for words in ('', 'if True: time.sleep(delay) raise ProvisioningError(problem)'):
            rewritten = with_comments_rewritten(text, words)
            self.assertNotEqual(rewritten, text)
            # the same code: each snippet is found at the same place of it
            self.assertEqual(mutations.code_view(rewritten)[0], mutations.code_view(text)[0])
            for mutation in mutations.MUTATIONS:
                with self.subTest(mutation=mutation.id, words=words):
                    self.assertIsNone(mutations.stale(mutation, rewritten))
                    self.assertNotEqual(mutations.mutate(rewritten, mutation), rewritten)

    def test_a_snippet_in_a_comment_is_neither_counted_nor_mutated(self):
        mutation = mutations.Mutation('m', 'd', 'time.sleep(delay)', 'pass', ['tests.x'])
        text = ('def f(delay):\n'
                '    # time.sleep(delay) would wait\n'
                '    time.sleep(delay)  # time.sleep(delay) again\n'
                '    return delay\n')
        self.assertIsNone(mutations.stale(mutation, text))
        self.assertEqual(mutations.mutate(text, mutation),
                         'def f(delay):\n'
                         '    # time.sleep(delay) would wait\n'
                         '    pass  # time.sleep(delay) again\n'
                         '    return delay\n')
        # a snippet across lines skips a comment's own line and a trailing comment
        mutation = mutations.Mutation('m', 'd', 'time.sleep(delay)\n    return', 'return',
                                      ['tests.x'])
        self.assertIsNone(mutations.stale(mutation, text))
        self.assertEqual(mutations.mutate(text, mutation).splitlines()[2:],
                         ['    return delay'])

    def test_a_snippet_that_holds_a_comment_is_stale(self):
        mutation = mutations.Mutation('m', 'd', 'time.sleep(delay)  # time.sleep(delay) again',
                                      'pass', ['tests.x'])
        text = 'time.sleep(delay)  # time.sleep(delay) again\n'
        with self.assertRaisesRegex(ValueError, 'occurs 0 times in the code'):
            mutations.mutate(text, mutation)


if __name__ == '__main__':
    unittest.main()
