// The README's JavaScript example, unchanged except that the base URL can come from CORRAL_BASE_URL.
import OpenAI from 'openai'

const openai = new OpenAI({
  baseURL: process.env.CORRAL_BASE_URL ?? 'http://localhost:11434/v1/',
  apiKey: 'ollama', // required by the client, ignored by corral
})

const chatCompletion = await openai.chat.completions.create({
  messages: [{ role: 'user', content: 'Say this is a test' }],
  model: 'smollm2:135m',
})

const completion = await openai.completions.create({
  model: 'smollm2:135m',
  prompt: 'Say this is a test.',
})

const listCompletion = await openai.models.list()

const model = await openai.models.retrieve('smollm2:135m')

console.log(JSON.stringify({
  chat: chatCompletion.choices[0].message.content,
  chatFinish: chatCompletion.choices[0].finish_reason,
  completion: completion.choices[0].text,
  models: listCompletion.data.map((m) => m.id),
  model: model.id,
}))
