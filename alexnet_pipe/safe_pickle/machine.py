"""The stack machine: ``Machine`` runs the allowed opcodes over plain Python containers within the
limits on objects, memory and integer width, and ``finish`` then puts the arrays in place of the
arrays under construction and refuses cycles, nesting deeper than ``MAX_DEPTH`` and shared parts
that add up to a tree much larger than the file (see the package docstring).
"""

from __future__ import annotations

from alexnet_pipe.errors import FormatError, UnsafePickleError
from alexnet_pipe.safe_pickle.constructors import (
    ATOMS,
    GLOBALS,
    ArrayPending,
    ConstructorCalls,
    DtypePending,
    Global,
    typename,
)
from alexnet_pipe.safe_pickle.opcodes import GET_OPS, PUT_OPS, VALUE_OPS, OpReader, global_refused

MAX_DEPTH = 100  # nesting of containers; neon's weights nest about 10 deep
MAX_OBJECTS = 5_000_000  # objects made (and memo entries); neon's pickles hold thousands
ALLOC_FACTOR = 4  # array data and decoded bytes, as a multiple of the file's size (+ 1 MiB)
_INT_RANGE = (-(1 << 63), 1 << 64)  # int64 and uint64


class Machine(ConstructorCalls):
    """Runs the allowed opcodes over plain Python containers; see the package docstring. REDUCE and BUILD
    are ``ConstructorCalls`` (constructors.py)."""

    def __init__(self, data: bytes, max_objects: int):
        self.data = data
        self.stack: list[object] = []
        self.marks: list[int] = []
        self.memo: dict[int, object] = {}
        self.objects_left = max_objects
        self.bytes_left = ALLOC_FACTOR * len(data) + (1 << 20)
        self.pos = 0

    # -- bookkeeping
    def _bad(self, what: str) -> FormatError:
        return FormatError(f"not a readable pickle: {what} (at byte {self.pos})")

    def _refuse(self, what: str) -> UnsafePickleError:
        return UnsafePickleError(f"{what} (at byte {self.pos}); refusing the pickle")

    def _count(self) -> None:
        self.objects_left -= 1
        if self.objects_left < 0:
            raise self._refuse("the pickle makes more objects than allowed")

    def _new(self, obj: object) -> None:
        self._count()
        self.stack.append(obj)

    def _alloc(self, nbytes: int) -> None:
        self.bytes_left -= nbytes
        if self.bytes_left < 0:
            raise self._refuse(f"the pickle asks for more memory than {ALLOC_FACTOR}x its size")

    def _pop(self) -> object:
        if len(self.stack) <= (self.marks[-1] if self.marks else 0):
            raise self._bad("stack underflow")
        return self.stack.pop()

    def _top(self) -> object:
        if len(self.stack) <= (self.marks[-1] if self.marks else 0):
            raise self._bad("stack underflow")
        return self.stack[-1]

    def _pop_mark(self) -> list[object]:
        if not self.marks:
            raise self._bad("no MARK before an opcode that needs one")
        start = self.marks.pop()
        items = self.stack[start:]
        del self.stack[start:]
        return items

    # -- values
    def _key(self, key: object) -> object:
        ok = isinstance(key, ATOMS) or (type(key) is tuple and all(isinstance(k, ATOMS) for k in key))
        if not ok:
            raise self._refuse(f"a dict key is {typename(key)}; only numbers, strings and tuples of them are allowed")
        return key

    # -- the loop
    def run(self) -> object:  # noqa: C901 -- one branch per opcode
        stack = self.stack
        for name, arg, pos in OpReader(self.data):
            self.pos = pos
            if name in ("PROTO", "FRAME"):
                continue
            if name == "STOP":
                if self.marks or len(stack) != 1:
                    raise self._bad(f"STOP with {len(stack)} values and {len(self.marks)} marks left")
                return stack[0]
            if name == "MARK":
                self.marks.append(len(stack))
            elif name == "POP":
                if len(stack) > (self.marks[-1] if self.marks else 0):
                    stack.pop()
                else:
                    self._pop_mark()
            elif name == "POP_MARK":
                self._pop_mark()
            elif name == "DUP":
                stack.append(self._top())
            elif name in PUT_OPS:
                key = len(self.memo) if name == "MEMOIZE" else arg
                if key < 0:
                    raise self._bad("negative memo index")
                self._count()
                self.memo[key] = self._top()
            elif name in GET_OPS:
                if arg not in self.memo:
                    raise self._bad(f"memo index {arg} was never stored")
                stack.append(self.memo[arg])
            elif name in ("NONE", "NEWTRUE", "NEWFALSE"):
                self._new({"NONE": None, "NEWTRUE": True, "NEWFALSE": False}[name])
            elif name in VALUE_OPS:
                if type(arg) is int and not _INT_RANGE[0] <= arg < _INT_RANGE[1]:
                    raise self._refuse("the pickle holds an integer wider than 64 bits")
                self._new(arg)
            elif name == "GLOBAL":
                self._push_global(arg)
            elif name == "STACK_GLOBAL":
                attr, module = self._pop(), self._pop()
                if not (isinstance(module, str) and isinstance(attr, str)):
                    raise self._refuse("the pickle computes the name of a global")
                self._push_global((module, attr))
            elif name == "EMPTY_DICT":
                self._new({})
            elif name == "EMPTY_LIST":
                self._new([])
            elif name == "EMPTY_TUPLE":
                self._new(())
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                n = int(name[-1])
                items = [self._pop() for _ in range(n)][::-1]
                self._new(tuple(items))
            elif name == "TUPLE":
                self._new(tuple(self._pop_mark()))
            elif name == "LIST":
                self._new(self._pop_mark())
            elif name == "DICT":
                self._new(self._pairs({}, self._pop_mark()))
            elif name == "APPEND":
                value = self._pop()
                self._list(self._top()).append(value)
            elif name == "APPENDS":
                items = self._pop_mark()
                self._list(self._top()).extend(items)
            elif name == "SETITEM":
                value, key = self._pop(), self._pop()
                self._pairs(self._dict(self._top()), [key, value])
            elif name == "SETITEMS":
                items = self._pop_mark()
                self._pairs(self._dict(self._top()), items)
            elif name == "REDUCE":
                args, func = self._pop(), self._pop()
                self._new(self._reduce(func, args))
            elif name == "BUILD":
                state = self._pop()
                self._build(self._top(), state)
            else:
                raise AssertionError(name)
        raise AssertionError("unreachable: OpReader ends with STOP or raises")

    def _push_global(self, names: tuple[str, str]) -> None:
        kind = GLOBALS.get(names)
        if kind is None:
            raise global_refused(*names, self.pos)
        self._new(Global(kind, ".".join(names)))

    def _list(self, target: object) -> list:
        if type(target) is not list:
            raise self._refuse(f"the pickle appends to {typename(target)}")
        return target

    def _dict(self, target: object) -> dict:
        if type(target) is not dict:
            raise self._refuse(f"the pickle sets items of {typename(target)}")
        return target

    def _pairs(self, target: dict, items: list[object]) -> dict:
        if len(items) % 2:
            raise self._bad("a dict is given an odd number of keys and values")
        for i in range(0, len(items), 2):
            target[self._key(items[i])] = items[i + 1]
        return target


# ---------------------------------------------------------------- the result

def _leaf(obj: object) -> object:
    if isinstance(obj, ATOMS):
        return obj
    if isinstance(obj, ArrayPending):
        if obj.array is None:
            raise FormatError("not a readable pickle: a numpy array is never given its data")
        return obj.array
    if isinstance(obj, DtypePending):
        return obj.fix()
    if isinstance(obj, Global):
        raise UnsafePickleError(f"the pickle holds {obj.name} itself as a value; refusing it")
    raise AssertionError(type(obj))


def finish(root: object, max_nodes: int) -> object:
    """Replace arrays under construction by the arrays; refuse cycles, deep nesting, blow-ups.

    Iterative, so a deep file cannot exhaust Python's stack; each container is done once,
    shared ones included.
    """
    if type(root) not in (dict, list, tuple):
        return _leaf(root)
    done: dict[int, tuple[object, int]] = {}  # id -> (finished object, tree size)
    open_ids = {id(root)}
    frames = [[root, list(root.values()) if type(root) is dict else list(root), 0, [], 1]]
    while True:
        frame = frames[-1]
        node, kids, i, out, size = frame
        if i < len(kids):
            frame[2] += 1
            kid = kids[i]
            if type(kid) in (dict, list, tuple):
                if id(kid) in done:
                    value, kid_size = done[id(kid)]
                    out.append(value)
                    frame[4] += kid_size
                elif id(kid) in open_ids:
                    raise UnsafePickleError("the pickle holds a container that contains itself; refusing it")
                elif len(frames) >= MAX_DEPTH:
                    raise UnsafePickleError(f"the pickle nests containers more than {MAX_DEPTH} deep; refusing it")
                else:
                    open_ids.add(id(kid))
                    frames.append([kid, list(kid.values()) if type(kid) is dict else list(kid), 0, [], 1])
                    continue
            else:
                out.append(_leaf(kid))
                frame[4] += 1
            if frame[4] > max_nodes:
                raise UnsafePickleError("the pickle's shared parts add up to a tree much larger than the file "
                                        "(a 'billion laughs'); refusing it")
            continue
        frames.pop()
        open_ids.discard(id(node))
        if type(node) is dict:
            for key, value in zip(list(node), out):
                node[key] = value
            result = node
        elif type(node) is list:
            node[:] = out
            result = node
        else:
            result = tuple(out)
        done[id(node)] = (result, size)
        if not frames:
            return result
        frames[-1][3].append(result)
        frames[-1][4] += size
        if frames[-1][4] > max_nodes:
            raise UnsafePickleError("the pickle's shared parts add up to a tree much larger than the file "
                                    "(a 'billion laughs'); refusing it")
