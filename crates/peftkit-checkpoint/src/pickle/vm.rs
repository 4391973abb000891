//! A pickle machine that builds values and never calls anything it was not told it may.
//!
//! Python's unpickler resolves every `GLOBAL` to an importable object and calls whatever a
//! `REDUCE` names: a pickle is a program. This machine runs only the data opcodes (numbers,
//! strings, containers, the memo) and hands every global to an allow list ([`Globals`]),
//! which refuses anything but the few constructors a weights file needs *when the global is
//! named*, before any call. Nothing is imported, nothing is executed.
//!
//! Written by hand because no crate fits: `serde-pickle` has no persistent ids (`BINPERSID`,
//! which is how torch points at its storages) and resolves globals itself; candle's pickle
//! reader comes with all of candle and no allow list.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use super::torch::{StorageRef, TensorRef};
use crate::tensor::Dtype;

/// A value on the machine's stack.
#[derive(Debug, Clone)]
pub(crate) enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer wider than 64 bits, as its little-endian two's-complement bytes (the
    /// legacy format's magic number).
    Long(Vec<u8>),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    /// Lists and dicts are shared, as in Python: a memo entry is the object that later
    /// opcodes fill.
    List(Rc<RefCell<Vec<Value>>>),
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    /// A global the allow list accepted (a callable or a storage type).
    Global(Global),
    /// A storage named by a persistent id.
    Storage(StorageRef),
    /// A tensor view rebuilt by `torch._utils._rebuild_tensor_v2` and kin.
    Tensor(TensorRef),
}

/// The globals a weights file may name: the allow list's verdicts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Global {
    /// `collections.OrderedDict`.
    OrderedDict,
    /// `torch._utils._rebuild_tensor_v2` / `_rebuild_tensor`.
    RebuildTensor,
    /// `torch._utils._rebuild_parameter` / `_rebuild_parameter_with_state`.
    RebuildParameter,
    /// `_codecs.encode`, which protocol 2 uses for `bytes`.
    Encode,
    /// A storage type (`torch.FloatStorage`) and the dtype of its elements.
    Storage(Dtype),
}

/// The allow list: what a `module.name` global is, or `None` to refuse it.
pub(crate) type Globals = fn(&str, &str) -> Option<Global>;

/// What stops the machine.
#[derive(Debug)]
pub(crate) enum VmError {
    /// A global outside the allow list (`os.system`).
    Refused(String),
    /// The data ends before the pickle does.
    Truncated,
    /// Anything else: an unknown opcode, a wrong stack.
    Invalid(String),
}

fn bad(reason: impl Into<String>) -> VmError {
    VmError::Invalid(reason.into())
}

/// Calls an allowed global: `(callable, args) -> value`.
pub(crate) type Call = fn(&Global, Vec<Value>) -> Result<Value, VmError>;
/// Resolves a persistent id (torch's storage tuple) to a value.
pub(crate) type PersistentLoad<'a> = &'a mut dyn FnMut(Value) -> Result<Value, VmError>;

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
}

/// Runs one pickle from `data[start..]` and returns its value and the position after `STOP`.
pub(crate) fn run(
    data: &[u8],
    start: usize,
    globals: Globals,
    call: Call,
    persistent: PersistentLoad<'_>,
) -> Result<(Value, usize), VmError> {
    let mut m = Machine {
        data,
        pos: start,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
    };
    loop {
        let op = m.byte()?;
        if op == b'.' {
            let v = m.pop()?;
            return Ok((v, m.pos));
        }
        m.step(op, globals, call, persistent)?;
    }
}

impl Machine<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], VmError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.data.len())
            .ok_or(VmError::Truncated)?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn byte(&mut self) -> Result<u8, VmError> {
        Ok(self.take(1)?[0])
    }
    fn le(&mut self, n: usize) -> Result<u64, VmError> {
        let mut b = [0u8; 8];
        b[..n].copy_from_slice(self.take(n)?);
        Ok(u64::from_le_bytes(b))
    }
    fn line(&mut self) -> Result<String, VmError> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or(VmError::Truncated)?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }
    fn sized(&mut self, n: u64) -> Result<Vec<u8>, VmError> {
        let n = usize::try_from(n).map_err(|_| bad("a string longer than memory"))?;
        Ok(self.take(n)?.to_vec())
    }
    fn pop(&mut self) -> Result<Value, VmError> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err(bad("pop across a mark"));
        }
        self.stack
            .pop()
            .ok_or_else(|| bad("pop from an empty stack"))
    }
    fn top(&mut self) -> Result<&mut Value, VmError> {
        self.stack.last_mut().ok_or_else(|| bad("empty stack"))
    }
    fn pop_mark(&mut self) -> Result<Vec<Value>, VmError> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| bad("no mark on the stack"))?;
        if m > self.stack.len() {
            return Err(bad("mark above the stack"));
        }
        Ok(self.stack.split_off(m))
    }
    fn push(&mut self, v: Value) {
        self.stack.push(v);
    }
    fn text(&mut self, n: u64) -> Result<(), VmError> {
        let b = self.sized(n)?;
        let s = String::from_utf8(b).map_err(|_| bad("a string that is not UTF-8"))?;
        self.push(Value::Str(s));
        Ok(())
    }
    fn global(&mut self, module: &str, name: &str, globals: Globals) -> Result<(), VmError> {
        match globals(module, name) {
            Some(g) => {
                self.push(Value::Global(g));
                Ok(())
            }
            None => Err(VmError::Refused(format!("{module}.{name}"))),
        }
    }
    fn memo_put(&mut self, key: u32) -> Result<(), VmError> {
        let v = self.top()?.clone();
        self.memo.insert(key, v);
        Ok(())
    }
    fn memo_get(&mut self, key: u32) -> Result<(), VmError> {
        let v = self
            .memo
            .get(&key)
            .cloned()
            .ok_or_else(|| bad(format!("memo entry {key} used before it was set")))?;
        self.push(v);
        Ok(())
    }

    fn step(
        &mut self,
        op: u8,
        globals: Globals,
        call: Call,
        persistent: PersistentLoad<'_>,
    ) -> Result<(), VmError> {
        match op {
            0x80 => {
                let proto = self.byte()?;
                if proto > 5 {
                    return Err(bad(format!("pickle protocol {proto} is unknown")));
                }
            }
            0x95 => {
                self.le(8)?;
            }
            b'(' => self.marks.push(self.stack.len()),
            b'0' => {
                self.pop()?;
            }
            b'1' => {
                self.pop_mark()?;
            }
            b'2' => {
                let v = self.top()?.clone();
                self.push(v);
            }
            b'N' => self.push(Value::None),
            0x88 => self.push(Value::Bool(true)),
            0x89 => self.push(Value::Bool(false)),
            b'J' => {
                let v = self.le(4)? as u32 as i32;
                self.push(Value::Int(v.into()));
            }
            b'K' => {
                let v = self.byte()?;
                self.push(Value::Int(v.into()));
            }
            b'M' => {
                let v = self.le(2)?;
                self.push(Value::Int(v as i64));
            }
            0x8a => {
                let n = self.byte()? as usize;
                let b = self.take(n)?;
                if n > 8 {
                    let wide = Value::Long(b.to_vec());
                    self.push(wide);
                    return Ok(());
                }
                let mut buf = if b.last().is_some_and(|&x| x & 0x80 != 0) {
                    [0xff; 8]
                } else {
                    [0; 8]
                };
                buf[..n].copy_from_slice(b);
                self.push(Value::Int(i64::from_le_bytes(buf)));
            }
            b'I' | b'L' => {
                let line = self.line()?;
                let t = line.trim_end_matches('L');
                let v = match t {
                    "00" => Value::Bool(false),
                    "01" => Value::Bool(true),
                    _ => Value::Int(t.parse().map_err(|_| bad(format!("bad integer `{t}`")))?),
                };
                self.push(v);
            }
            b'G' => {
                let b = self.take(8)?;
                let v = f64::from_be_bytes(b.try_into().expect("8 bytes"));
                self.push(Value::Float(v));
            }
            b'X' => {
                let n = self.le(4)?;
                self.text(n)?;
            }
            0x8c => {
                let n = self.byte()?;
                self.text(n.into())?;
            }
            0x8d => {
                let n = self.le(8)?;
                self.text(n)?;
            }
            b'T' | b'B' => {
                let n = self.le(4)?;
                let b = self.sized(n)?;
                self.push(Value::Bytes(b));
            }
            b'U' | b'C' => {
                let n = self.byte()?;
                let b = self.sized(n.into())?;
                self.push(Value::Bytes(b));
            }
            0x8e | 0x96 => {
                let n = self.le(8)?;
                let b = self.sized(n)?;
                self.push(Value::Bytes(b));
            }
            b')' => self.push(Value::Tuple(Vec::new())),
            b't' => {
                let items = self.pop_mark()?;
                self.push(Value::Tuple(items));
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if self.stack.len() < n {
                    return Err(bad("tuple of more items than the stack holds"));
                }
                let items = self.stack.split_off(self.stack.len() - n);
                self.push(Value::Tuple(items));
            }
            b']' => self.push(Value::List(Rc::default())),
            b'l' => {
                let items = self.pop_mark()?;
                self.push(Value::List(Rc::new(RefCell::new(items))));
            }
            0x8f => self.push(Value::List(Rc::default())),
            0x91 => {
                let items = self.pop_mark()?;
                self.push(Value::List(Rc::new(RefCell::new(items))));
            }
            b'a' => {
                let v = self.pop()?;
                self.extend(vec![v])?;
            }
            b'e' | 0x90 => {
                let items = self.pop_mark()?;
                self.extend(items)?;
            }
            b'}' => self.push(Value::Dict(Rc::default())),
            b'd' => {
                let items = self.pop_mark()?;
                let d = Value::Dict(Rc::default());
                self.push(d);
                self.set_items(items)?;
            }
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                self.set_items(vec![k, v])?;
            }
            b'u' => {
                let items = self.pop_mark()?;
                self.set_items(items)?;
            }
            b'q' => {
                let k = self.byte()?;
                self.memo_put(k.into())?;
            }
            b'r' => {
                let k = self.le(4)? as u32;
                self.memo_put(k)?;
            }
            0x94 => {
                let k = self.memo.len() as u32;
                self.memo_put(k)?;
            }
            b'p' => {
                let k = self.line()?;
                self.memo_put(k.parse().map_err(|_| bad("bad memo key"))?)?;
            }
            b'h' => {
                let k = self.byte()?;
                self.memo_get(k.into())?;
            }
            b'j' => {
                let k = self.le(4)? as u32;
                self.memo_get(k)?;
            }
            b'g' => {
                let k = self.line()?;
                self.memo_get(k.parse().map_err(|_| bad("bad memo key"))?)?;
            }
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                self.global(&module, &name, globals)?;
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                match (module, name) {
                    (Value::Str(m), Value::Str(n)) => self.global(&m, &n, globals)?,
                    _ => return Err(bad("STACK_GLOBAL of something that is not two strings")),
                }
            }
            b'i' => {
                // INST names its class inline: the allow list sees it like any global.
                let module = self.line()?;
                let name = self.line()?;
                self.global(&module, &name, globals)?;
                return Err(bad(format!("INST of {module}.{name}")));
            }
            b'R' => {
                let args = self.pop()?;
                let f = self.pop()?;
                let (Value::Global(g), Value::Tuple(args)) = (f, args) else {
                    return Err(bad("REDUCE of something that is not an allowed global"));
                };
                let v = call(&g, args)?;
                self.push(v);
            }
            b'b' => {
                // BUILD sets an object's state. Only an OrderedDict's attributes (the
                // `_metadata` of a state dict) are accepted, and ignored.
                let state = self.pop()?;
                match (self.top()?, state) {
                    (Value::Dict(_), Value::Dict(_) | Value::None) => {}
                    (Value::Tensor(_), Value::Dict(d)) if d.borrow().is_empty() => {}
                    _ => {
                        return Err(bad(
                            "BUILD (setting an object's state) on a value that is not a dict",
                        ))
                    }
                }
            }
            b'Q' => {
                let pid = self.pop()?;
                let v = persistent(pid)?;
                self.push(v);
            }
            b'P' => return Err(bad("a text persistent id (torch writes binary ones)")),
            0x81 | 0x92 | b'o' => {
                return Err(bad(format!(
                    "opcode 0x{op:02x} creates an object of a class; weights files never do"
                )))
            }
            0x82..=0x84 => return Err(bad("an extension-registry global (EXT opcodes)")),
            other => return Err(bad(format!("unknown or unsupported opcode 0x{other:02x}"))),
        }
        Ok(())
    }

    fn extend(&mut self, items: Vec<Value>) -> Result<(), VmError> {
        match self.top()? {
            Value::List(l) => {
                l.borrow_mut().extend(items);
                Ok(())
            }
            _ => Err(bad("APPEND to something that is not a list")),
        }
    }

    fn set_items(&mut self, items: Vec<Value>) -> Result<(), VmError> {
        if !items.len().is_multiple_of(2) {
            return Err(bad("SETITEMS with an odd number of values"));
        }
        let Value::Dict(d) = self.top()? else {
            return Err(bad("SETITEM on something that is not a dict"));
        };
        let mut d = d.borrow_mut();
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            d.push((k, v));
        }
        Ok(())
    }
}
