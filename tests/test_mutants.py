"""tests/mutations.py stays usable: every mutation's snippet occurs exactly once in
today's azure_provisioning.py and its modules exist.  (The campaign itself is
`python3 tests/mutations.py`, not part of unittest: it runs suites many times.)"""

import os
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


if __name__ == '__main__':
    unittest.main()
